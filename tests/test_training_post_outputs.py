import json

from omegaconf import OmegaConf
from post_training_inputs import make_inputs

from lmpipe.evaluation.variants import torch_variant_name
from lmpipe.model import load_model
from lmpipe.training.core import TrainResult
from lmpipe.training.post_outputs import write_policy_outputs


def test_a_policy_stage_writes_a_model_directory_like_sfts(tmp_path):
    inputs = make_inputs(tmp_path)
    model = load_model(inputs.models / "sft" / "model.pt")[0]
    cfg = OmegaConf.create(
        {
            "paths": {
                "models": str(inputs.models),
                "plots": str(tmp_path / "plots"),
                "metrics": str(tmp_path / "m"),
            }
        }
    )
    result = TrainResult(
        model, {"steps": 3}, {"train_loss": [(1, 0.5)]}, [{"prompt": "p", "completion": "c"}]
    )
    out = write_policy_outputs(cfg, "dpo", "sft", result)
    loaded, extra = load_model(out / "model.pt")
    assert torch_variant_name(extra) == "dpo" and extra["metrics"] == {"steps": 3}
    assert (out / "tokenizer.json").read_bytes() == (inputs.models / "sft" / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "m" / "dpo.json").read_text()) == {"steps": 3}
    assert (tmp_path / "plots" / "dpo" / "train_loss.csv").read_text() == "step,loss\n1,0.500000\n"
