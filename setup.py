"""teonspeed: Muon-family optimizers (Muon, TEON, HTMuon) for DeepSpeed and Megatron-core.

torch is pinned to the release that the rest of the stack was verified with. On a CPU machine install
it first from the CPU index or wheel (scripts/setup_env.sh does), so that pip never resolves the
pin to a multi-GB CUDA build; on a GPU machine the same pin takes the CUDA build already there.
"""
from setuptools import find_packages, setup

setup(
    name="teonspeed",
    version="0.1.0",
    description="Muon, TEON and HTMuon optimizers, parallel-aware, for DeepSpeed and Megatron-core",
    python_requires=">=3.10",
    # src layout: the package is the folder plugin/teonspeed (patches/ at the top is a link to its patches),
    # so a folder named `teonspeed` beside a user's script (a clone) cannot shadow the installed package.
    package_dir={"": "plugin"},
    packages=find_packages("plugin"),
    install_requires=[
        "torch==2.13.0",
        "numpy",
    ],
    extras_require={
        # The integrations: the versions this code and its patches were written for.
        "deepspeed": ["deepspeed==0.19.8"],
        "megatron": ["megatron-core>=0.16.1,<0.17"],
        "launch": ["tokenizers>=0.19", "tqdm", "matplotlib", "pyyaml", "tensorboard>=2.14"],
        # transformers + accelerate: the Hugging Face Trainer integration test (tests/integration/test_hf_trainer.py).
        "dev": ["pytest>=8", "ruff==0.17.6", "deepspeed==0.19.8", "megatron-core>=0.16.1,<0.17", "tokenizers>=0.19", "triton>=3.4",
                "transformers==5.24.0", "accelerate==1.15.0"],
        "triton": ["triton>=3.4"],
        # NVIDIA apex is not on PyPI (the PyPI "apex" is an unrelated web toolkit): build it from source.
        "apex": [],
    },
)
