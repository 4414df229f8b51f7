"""Small parameters that run every notebook in seconds (papermill and browser tests)."""

SMALL = {
    "kv_rotation": dict(world_size=2, seq_len=256, heads=2, kv_heads=1, head_dim=16),
    "memory": dict(sizes=[256, 512], ring_sizes=[2], heads=2, head_dim=16, seed_sizes=[1024, 2048],
                   seed_measured_up_to=1024),
    "dilation": dict(seq_len=32, heads=2),
    "correctness": dict(seq_len=32, world_sizes=[1, 2], dtypes=["float64", "float32"], backends=["auto"]),
    "scaling": dict(sizes=[256, 512], world_size=2, repeats=1),
    "parallelism": dict(seq_len=16, world_size=4, bytes_seq_len=32, map_tokens=[2**17, 2**20], map_gpus=[8, 32]),
    "billion_tokens": dict(tokens=[2**20, 2**24], gpus=["h100"], dry_run_tokens=2**24),
}
