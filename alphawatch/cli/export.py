"""`export`: a run's robust statistics into an experiment tracker."""

from __future__ import annotations

import argparse

from alphawatch.cli.common import EXIT_OK, UserError, prepare_database, settings_of


def run_export(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from alphawatch.integrations.export import (
        MlflowTarget,
        Target,
        TensorBoardTarget,
        WandbTarget,
        export_run,
    )
    from alphawatch.integrations.export.trackers import TrackerMissing
    from alphawatch.service.db.models import Run
    from alphawatch.service.db.session import make_engine, session_scope

    settings = settings_of(args)
    prepare_database(settings, migrate=False)
    target: Target
    if args.tracker == "mlflow":
        target = MlflowTarget(args.tracking_uri, args.experiment)
    elif args.tracker == "tensorboard":
        target = TensorBoardTarget(args.logdir.expanduser().resolve())
    else:
        target = WandbTarget(
            args.project, args.entity, args.dir.expanduser().resolve() if args.dir else None
        )
    with session_scope(make_engine(settings.database_url)) as session:
        query = select(Run).where(Run.name == args.run)
        run = session.scalars(query).first()
        if run is None and args.run.isdigit():
            run = session.get(Run, int(args.run))
        if run is None:
            raise UserError(f"no run named {args.run!r} in {settings.database_url}")
        try:
            tracker = target.open(run.name)
            try:
                count = export_run(
                    session=session,
                    run_id=run.id,
                    tracker=tracker,
                    thresholds=settings.trust,
                    method=args.method or settings.fit_method,
                    layers=args.layers,
                )
            finally:
                tracker.close()
                target.shutdown()
        except TrackerMissing as exc:
            raise UserError(str(exc)) from exc
        except Exception as exc:  # each tracker raises its own types (MlflowException, ...)
            raise UserError(
                f"export to {args.tracker} failed: {type(exc).__name__}: {exc}"
            ) from exc
        print(f"alphawatch: logged {count} new values of run {run.name!r} to {args.tracker}")
    return EXIT_OK
