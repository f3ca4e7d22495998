"""lavis-medblip: MedBLIP (3D brain MRI + EHR text) as a plugin for Salesforce LAVIS.

LAVIS 1.0.2's own metadata pins transformers<4.27, which cannot run decoder-only LMs from
``inputs_embeds`` nor Llama-family models; install it with ``pip install --no-deps
salesforce-lavis==1.0.2`` next to the ranges below (``requirements/lock.txt`` has exact pins).

Besides the packages, the distribution puts ``lavis_medblip_autoregister.pth`` at the top of
site-packages, so every interpreter of the environment lets LAVIS find the plugin by itself
(see ``lavis_medblip_autoregister.py``).
"""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

STARTUP_HOOK = "lavis_medblip_autoregister.pth"


class BuildPyWithStartupHook(build_py):
    """``build_py`` that also ships :data:`STARTUP_HOOK`, in wheels and in editable installs."""

    def run(self) -> None:
        super().run()
        self.copy_file(STARTUP_HOOK, os.path.join(self.build_lib, STARTUP_HOOK), preserve_mode=False)
        if self.editable_mode:
            # An editable wheel takes a build command's files only from the unpacked wheel, install's install_lib then.
            install_lib = self.get_finalized_command("install").install_lib
            self.copy_file(STARTUP_HOOK, os.path.join(install_lib, STARTUP_HOOK), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, STARTUP_HOOK)]

    def get_source_files(self) -> list[str]:
        return [*super().get_source_files(), STARTUP_HOOK]


setup(
    name="lavis-medblip",
    version="0.1.0",
    description="MedBLIP for 3D brain MRI and EHR text, registered into Salesforce LAVIS",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(include=["lavis_medblip", "lavis_medblip.*", "dataset_builders", "dataset_builders.*"]),
    py_modules=["lavis_medblip_autoregister"],
    package_data={"lavis_medblip": ["models/configs/*.yaml", "assets/*", "assets/**/*", "configs/**/*.yaml",
                                    "app/static/*", "app/static/**/*"]},
    install_requires=[
        # salesforce-lavis==1.0.2 is required too, installed with --no-deps (see above).
        "torch>=2.1",
        "torchvision",
        # Tested: requirements/lock.txt (transformers 4.51.3, numpy 1.26.4) and requirements/newest.txt
        # (transformers 4.57.6, tokenizers 0.22.2, numpy 2.4.6). From 4.52 on, LAVIS 1.0.2 needs
        # lavis_medblip/compat.py; 5.x breaks LAVIS further than a small shim can mend (see there).
        "transformers>=4.40,<4.58",
        "peft>=0.14,<0.22",
        "numpy>=1.26,<2.5",
        "omegaconf>=2.1",
        "nibabel>=5",
        "scipy>=1.10",
        "sentencepiece",
        "sacremoses",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "nilearn", "pydicom", "gguf", "fastapi", "uvicorn", "python-multipart", "httpx",
                             "playwright"],
                    "gguf": ["gguf"], "dicom": ["pydicom"],
                    "app": ["fastapi", "uvicorn", "python-multipart"]},  # the web app (python -m lavis_medblip.app)
    cmdclass={"build_py": BuildPyWithStartupHook},
    entry_points={
        "console_scripts": [
            "medblip-train=lavis_medblip.cli.train:main",
            "medblip-evaluate=lavis_medblip.cli.evaluate:main",
            "medblip-predict=lavis_medblip.cli.predict:main",
            "medblip-export=lavis_medblip.cli.export:main",
            "medblip-warm-cache=lavis_medblip.cli.warm_cache:main",
            "medblip-app=lavis_medblip.app.cli:main",
        ]
    },
)
