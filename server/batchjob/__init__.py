"""`nereid batch`: score a dataset through a running server or in process (docs/BATCH.md).

Modules: args (the subcommand's flags), target (the model's tensors as the job needs them),
readers (npy/npz, and the entry for every kind), parquet_reader, jsonl_reader,
plan (dataset columns -> request tensors), remote / inprocess (the two scorers),
checkpoint (the manifest of finished row ranges), writers (chunk parts and the final output),
progress, job (the loop that ties them).
"""
