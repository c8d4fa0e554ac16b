"""protein_llava: a LLaVA-style protein LLM (fair-esm ESM-2 → projector → transformers causal LM).

Install torch first, pinned (`pip install torch==2.13.0`): an unpinned torch pulls a multi-GB CUDA build
on machines that do not need one. `make test` / `make demo` do this for you.
"""

from pathlib import Path

from setuptools import find_packages, setup


def requirements(name: str) -> list[str]:
    lines = Path(__file__).with_name(name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="protein_llava",
    version="0.1.0",
    description="Teach large language models to read proteins: ESM-2 + projector + LLM, LLaVA-style.",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["protein_llava", "protein_llava.*"]),
    # The model presets are data files (configuration.load_preset reads them from the installed package).
    package_data={"protein_llava": ["model/presets/*.json"]},
    install_requires=requirements("requirements.txt"),
    extras_require={
        # bitsandbytes (4-bit QLoRA, on CPU or GPU) is a regular dependency now, pinned in requirements.txt;
        # the empty extra keeps `pip install 'protein_llava[qlora]'` working.
        "qlora": [],
        "tensorboard": ["tensorboard==2.21.0"],
        "dev": requirements("requirements-dev.txt"),
    },
    entry_points={"console_scripts": ["protein-llava=protein_llava.cli:main"]},
)
