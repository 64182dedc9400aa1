"""Reading, bucketing and mixing task data; tokenization itself is ``mtl_jax.text``.

Entry point: ``mtl_jax.data.pipeline.build_data(config, tokenizer) -> RunData``.
"""
