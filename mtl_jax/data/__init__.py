"""Reading, tokenizing, bucketing and mixing task data. Entry point: ``build_data(config, tokenizer)``."""


def __getattr__(name):  # lazy: mtl_jax.tasks.types imports mtl_jax.data.tokenize at import time
    if name in ("build_data", "RunData", "TaskData", "load_tokenizer"):
        from mtl_jax.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
