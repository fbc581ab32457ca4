from setuptools import find_packages, setup

setup(
    name="uae_gen",
    version="0.1.0",
    description="Latent diffusion on the UAE (Prism Hypothesis) latent: diffusers-native tokenizer, DiT, training and eval",
    python_requires=">=3.10",
    packages=find_packages(include=["uae_gen", "uae_gen.*"]) + ["uae_gen.pipelines"],
    # The pipeline's source sits in the top-level pipelines/ folder; it installs as uae_gen.pipelines so that the
    # installed package holds it and `from uae_gen import UAEDiTPipeline` works outside the checkout.
    package_dir={"uae_gen.pipelines": "pipelines"},
    package_data={"uae_gen": ["data/*.json", "configs/*.json"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "diffusers>=0.35",
        "accelerate>=1.0",
        "timm>=1.0",
        "torch-fidelity>=0.3",
        "tqdm",
        "safetensors",
        "numpy",
        "pillow",
        "scipy",
        "scikit-learn",
        "scikit-image",
        "matplotlib",  # eval/ablation.py's generation curves
        "lpips",  # only for its shipped LPIPS v0.1 VGG linear-layer weights (uae_gen.losses.lpips)
    ],
    extras_require={
        "app": ["gradio>=6"],  # `uae-gen serve`
        # The playground's tests drive a real browser: Playwright runs the system Chromium (apt-get install -y
        # chromium), never a browser it downloads itself.
        # pytest-xdist: the suite runs on two workers (pytest.ini), one file per worker at a time.
        "test": ["pytest>=7", "pytest-xdist>=3", "transformers>=4.40", "gradio>=6", "playwright>=1.40"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["uae-gen=uae_gen.cli:main"]},
)
