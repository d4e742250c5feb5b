from setuptools import find_packages, setup

setup(
    name="clip-rd",
    version="0.2.0",
    description="Triton-accelerated relational knowledge distillation for CLIP models (CLIP-KD, CLIP-RD)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # bench/ and tests/ run from a checkout of the repository; the wheel holds the library and the commands
    packages=find_packages(include=["kernels", "kernels.*", "engine", "engine.*", "models", "models.*"]),
    package_data={"models": ["model_configs/*.json", "pretrained/*.pt", "pretrained/*.json"],
                  "kernels": ["README.md"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "open_clip_torch>=2.24",
        "webdataset>=0.2.86",
        "tqdm",
    ],
    # each `python -m engine.<command>` also as a command of its own: clip-rd-train, clip-rd-precompute, ...
    entry_points={"console_scripts": [
        f"clip-rd-{name}=engine.{name}:main"
        for name in ("train", "precompute", "store", "eval", "export", "synthetic", "teacher", "ablate")
    ]},
    extras_require={
        # transformers: open_clip loads an exported tiny model's word tokenizer through it (tests/test_export.py);
        # matplotlib and tensorboard: the tests check the charts and the event files too
        # pytest-xdist: the suite runs on every core (-n auto); pandas: open_clip_train (shipped with open_clip_torch,
        # whose training extra would pin webdataset <= 0.2.86) imports it; tests/test_peer.py runs open_clip_train
        "test": ["pytest>=7", "pytest-benchmark>=4", "pytest-xdist>=3", "transformers", "matplotlib", "tensorboard",
                 "pandas"],
        "peer": ["pandas", "matplotlib"],  # python -m bench.peer: open_clip_train side by side
        "plots": ["matplotlib"],
        "tensorboard": ["tensorboard"],
    },
)
