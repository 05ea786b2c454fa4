from pathlib import Path

from setuptools import find_packages, setup


def pinned(*names: str) -> list[str]:
    """The requirements.txt lines of ``names`` (the one place their versions are pinned)."""
    text = Path(__file__).with_name("requirements.txt").read_text()
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    found = {line.split("==")[0].split("[")[0].lower(): line for line in lines if "==" in line}
    missing = [name for name in names if name not in found]
    if missing:
        raise SystemExit(f"requirements.txt pins no {', '.join(missing)}")
    return [found[name] for name in names]


# A diffusers folder's transformer, VAE and text encoder are diffusers' and transformers' classes: the build and the
# PyTorch reference need them, the runtime does not (it tokenizes with tokenizers and runs ONNX graphs).
DIFFUSERS = pinned("diffusers", "transformers")

setup(
    name="l2c-export",
    version="0.1.0",
    description="Learning-to-Cache schedules for Diffusion Transformers, exported to ONNX Runtime and TensorRT engines",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["l2c_export", "l2c_export.*"]),
    package_data={"l2c_export": ["demo/*.safetensors", "demo/*/*", "demo/*/*/*", "schemas/*.json", "data/*.json"]},
    # torch is not pinned here: the Makefile installs torch==2.13.0 (CPU) first, which satisfies this range, so pip
    # never reaches for the multi-GB CUDA build.
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "click>=8.1",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pillow>=9",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
        "onnx>=1.16",
        "onnxruntime-gpu>=1.18",
        "polygraphy>=0.49",
        "onnx-graphsurgeon>=0.5",
        "jsonschema>=4.17",
        *pinned("tokenizers"),  # the runtime's prompt encoder (a build with a text encoder)
    ],
    # vae: the authors' latent models' `run --vae`, the same diffusers
    extras_require={"test": ["pytest>=7"], "tensorrt": ["tensorrt>=10"], "diffusers": DIFFUSERS, "vae": DIFFUSERS},
    entry_points={"console_scripts": ["l2c-export=l2c_export.cli:main"]},
)
