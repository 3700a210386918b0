"""alphawatch workers: checkpoint reading, the spectral engine and the watcher loop."""
