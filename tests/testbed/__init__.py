"""Offline test bed made of real parts, shared by tests and benchmarks (never by the scripts).

- `corpus`: deterministic images in every resolution bucket and every awkward format, plus broken files.
- `http_server`: a loopback HTTP server for that corpus (and 404/500/redirect/slow URLs).
- `laion_meta`: LAION metadata parquet in both real input schemas, pointing at that server.
- `i2d_shards`: img2dataset-shaped output shards (parquet + NNNNN_stats.json) without a download.
- `s3`: moto's S3 server on loopback behind a proxy that can be cut and restored mid-run.
- `models`: a tiny Stable-Diffusion-2-shaped model folder (vae/, text_encoder/, tokenizer/).
- `readback`: open any MDS output (local or s3://) with streaming's StreamingDataset.
- `loaded`: what a loaded machine does to a child's threads (CPython's executor exit race), forced.
"""
