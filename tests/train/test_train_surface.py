"""diffcse_train's public names: importable from the package, loaded only when used."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_package_import_is_cheap_and_names_load_on_use():
    code = (
        "import sys, diffcse_train\n"
        "assert 'torch' not in sys.modules, 'import diffcse_train loaded torch'\n"
        "from diffcse_train import TrainConfig, train, FitSettings, fit_generator, DiffCSE\n"
        "from diffcse_train import config, trainer, generator, model\n"
        "assert TrainConfig is config.TrainConfig and train is trainer.train\n"
        "assert diffcse_train.load_config is config.load_config\n"
        "assert FitSettings is generator.FitSettings\n"
        "assert fit_generator is generator.fit_generator and DiffCSE is model.DiffCSE\n"
        "assert set(diffcse_train.__all__) <= set(dir(diffcse_train))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_unknown_name_is_an_attribute_error():
    import diffcse_train

    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        diffcse_train.trian  # noqa: B018
