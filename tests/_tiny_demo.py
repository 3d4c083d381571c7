"""The demo's config at a tiny size: what the tests that run the demo pass after its own arguments."""

TINY_DEMO_ARGS = (
    "--trainer.enable_checkpointing=false",
    "--data.init_args.img_size=32",
    "--data.init_args.cue_size=6",
    "--data.init_args.num_train=64",
    "--data.init_args.num_val=32",
    "--data.init_args.batch_size=32",
    "--model.embed_dim=32",
    "--model.depth=2",
    "--model.num_heads=2",
)
