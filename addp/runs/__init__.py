"""Files on disk: safe writes, image decoding, streamed .npz samples, run-folder records and
the one-writer-per-folder lock."""
