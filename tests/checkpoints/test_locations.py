"""Object-store URLs: the normal form a run's URL must have, and the allowed URL prefixes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alphawatch.locations import ObjectURL, location, object_url, url_allowed
from alphawatch.settings import Settings


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("s3://bucket/team/../other", "'..' segment"),
        ("s3://bucket/team/./run", "'..' segment"),
        ("s3://bucket/team//run", "empty"),
        ("s3://AKIA:secret@bucket/run", "credentials"),
        ("s3://bucket:9000/run", "credentials"),
        ("ftp://bucket/run", "not supported"),
        ("s3://bucket/run?versionId=1", "'?'"),
        ("s3://bucket/run\nx", "control characters"),
        ("s3://Bad_Bucket/run", "not a bucket name"),
        ("s3://" + "b" * 30 + "/" + "k" * 1100, "longer than"),
    ],
)
def test_a_url_not_in_normal_form_is_refused_with_the_rule(text: str, rule: str) -> None:
    with pytest.raises(ValueError, match=rule.replace("?", r"\?").replace(".", r"\.")):
        object_url(text)


def test_a_url_is_normalised_and_named_like_a_path() -> None:
    url = object_url("s3://bucket/team/run-7/")
    assert url == "s3://bucket/team/run-7" and isinstance(url, ObjectURL)
    assert (url.scheme, url.bucket, url.key, url.name) == ("s3", "bucket", "team/run-7", "run-7")
    assert url.joined("checkpoint-5") == "s3://bucket/team/run-7/checkpoint-5"
    assert location("gs://bucket/x") == "gs://bucket/x"
    assert location("/runs/x") == Path("/runs/x")


def test_url_roots_match_segment_by_segment() -> None:
    roots = ["s3://bucket/team"]
    assert url_allowed(object_url("s3://bucket/team"), roots)
    assert url_allowed(object_url("s3://bucket/team/run"), roots)
    # A sibling sharing the root's text is not below it.
    assert not url_allowed(object_url("s3://bucket/team-2/run"), roots)
    assert not url_allowed(object_url("s3://other/team/run"), roots)
    assert not url_allowed(object_url("gs://bucket/team/run"), roots)


def test_allowed_roots_take_url_prefixes_beside_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "ALPHAWATCH_ALLOWED_ROOTS", json.dumps([str(tmp_path), "s3://bucket/team/", "gs://b22/x"])
    )
    settings = Settings()
    # The local roots are resolved as before; the URL prefixes are kept apart, normalised.
    assert settings.allowed_roots == [tmp_path.resolve()]
    assert settings.allowed_url_roots == ["s3://bucket/team", "gs://b22/x"]
    with pytest.raises(ValueError, match=r"'\.\.' segment"):
        Settings(allowed_roots=["s3://bucket/../etc"])  # type: ignore[list-item]
