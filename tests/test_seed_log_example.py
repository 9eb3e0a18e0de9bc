"""examples/seed_log.py end to end on a tiny Llama checkpoint (no download): train, replay, compare."""

import importlib.util
import sys

from .conftest import REPO
from .test_run_sst2_causal import tiny_causal_dir  # noqa: F401  (the fixture)


def test_seed_log_example_replays_the_trained_model(tiny_causal_dir, tmp_path):  # noqa: F811
    spec = importlib.util.spec_from_file_location("seed_log_example", REPO / "examples" / "seed_log.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["seed_log_example"] = module
    spec.loader.exec_module(module)
    result = module.main(
        [f"--model_name_or_path={tiny_causal_dir}", f"--output_dir={tmp_path}", "--max_steps=4", "--max_test_samples=24",
         "--learning_rate=1e-2", "--zo_method=lozo", "--zo_rank=2", "--zo_train_top_layers=1", "--seed=0"]
    )  # fmt: skip
    assert result["steps"] == 4
    assert result["weights_bit_identical"] and result["same_predictions"]
    assert result["seed_log_bytes"] < 10 * result["trained_tensor_bytes"]
    assert (tmp_path / "share" / "README.md").exists()
