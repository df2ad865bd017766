"""Hub checkpoint -> per-rank weight files for the expert-parallel runtime (see docs/weights.md).

`convert.convert(source, output, world_size, ...)` writes the files and manifest,
`manifest.verify(output)` re-hashes them, `download.download(repo_id, local_dir, ...)` fetches
only the needed shards; `python -m prepare_weights` / `prepare-weights` is the CLI.
"""
