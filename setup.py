import os

from setuptools import find_packages, setup

with open(os.path.join("sb3_metacpo", "version.txt")) as file_handler:
    __version__ = file_handler.read().strip()

with open("README.md", encoding="utf-8") as file_handler:
    long_description = file_handler.read()

DOCS = ["sphinx>=7", "sphinx-rtd-theme", "myst-parser"]

setup(
    name="sb3-metacpo",
    version=__version__,
    description="Safe meta-reinforcement learning (Meta-CPO) in the Stable-Baselines3 style",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(exclude=["tests", "tests.*", "benchmarks", "examples"]),
    package_data={"sb3_metacpo": ["py.typed", "version.txt", "hyperparams/*.yml"]},
    entry_points={"console_scripts": ["sb3-metacpo=sb3_metacpo.cli:main"]},
    python_requires=">=3.11",
    # Required: what `import sb3_metacpo` and training on Toy2DNav need. mujoco is imported by the navigation
    # families' fast step at import time; pyyaml by the configs; tqdm and rich by the progress bars.
    install_requires=[
        "stable-baselines3>=2.9.2,<3",
        "torch>=2.8",
        "gymnasium>=0.29.1,<1.0",
        "numpy>=2.0,<2.4",
        "scipy>=1.11",
        "mujoco>=3.3,<3.4",
        "pyyaml",
        "tqdm",
        "threadpoolctl>=3.1",
        "rich",
    ],
    extras_require={
        # safety-gymnasium 1.0.0 itself is deliberately absent: its own pins (gymnasium==0.28.1, pygame==2.1.0)
        # cannot be installed on Python 3.11 next to SB3 2.9. Install this extra, then
        # `pip install --no-deps safety-gymnasium==1.0.0` (the Makefile does); `sb3_metacpo.tasks.compat` makes it
        # work on this stack. These are its runtime dependencies.
        "safety-gym": ["xmltodict", "pyyaml", "imageio"],
        # dual_solver="cvxpylayers" (the dual as a differentiable convex program, the paper's) and more than 8
        # cost constraints; up to 8 the exact closed form needs neither (dual_solver="auto")
        "several-costs": ["cvxpylayers[torch]>=1.2,<2", "cvxpy>=1.9"],
        # learning and adaptation curves (matplotlib), GIFs (Pillow)
        "plots": ["matplotlib", "pillow"],
        # sampler="ray": meta-training with the envs in Ray actors, on one machine or a cluster (tested with 2.60)
        "ray": ["ray>=2.9"],
        # tensorboard_log= and the command line's TensorBoard logs
        "tensorboard": ["tensorboard"],
        # the baselines of benchmarks/ (sb3-contrib's TRPO)
        "benchmarks": ["sb3-contrib>=2.9.2,<3"],
        "docs": DOCS,
        # everything the test suite (and `make test`, which also builds the docs) needs
        "tests": [
            "pytest>=8",
            "pytest-timeout",
            "ruff",
            "mypy",
            "tensorboard",
            "sb3-contrib>=2.9.2,<3",
            "cvxpylayers[torch]>=1.2,<2",
            "cvxpy>=1.9",
            "xmltodict",
            "matplotlib",
            "imageio",
            "pillow",
            # Ray is in the test set-up so that CI runs the Ray sampler's tests (on a local 2-CPU Ray)
            "ray>=2.9",
            *DOCS,
        ],
    },
    license="MIT",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "License :: OSI Approved :: MIT License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
