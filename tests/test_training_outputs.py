from tiny_models import make_model_dir, tiny_tokenizer

from lmpipe.formats import MODEL_FILE, SAMPLES_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from lmpipe.model import load_model
from lmpipe.training.outputs import write_curves, write_model_dir


def test_a_model_directory_is_self_contained_and_replaced_whole(tmp_path):
    source = tmp_path / "source"
    model = make_model_dir(source, tiny_tokenizer())
    target = tmp_path / "models" / "pretrain"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("from an older run")
    samples = [{"prompt": "In", "completion": " the"}]

    def also(tmp):
        (tmp / "extra.json").write_text("{}")

    assert write_model_dir(target, model, {"stage": "test"}, source, samples, also=also) == target
    names = {p.name for p in target.iterdir()}
    assert names == {MODEL_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SAMPLES_FILE, "extra.json"}
    loaded, extra = load_model(target / MODEL_FILE)
    assert extra == {"stage": "test"} and loaded.config == model.config
    assert (target / SAMPLES_FILE).read_text() == "### 'In'\nIn the\n"


def test_curves_become_one_csv_each(tmp_path):
    write_curves(tmp_path / "plots", {"train_loss": [(1, 2.5), (2, 2.25)], "val_loss": []})
    assert (tmp_path / "plots" / "train_loss.csv").read_text() == "step,loss\n1,2.500000\n2,2.250000\n"
    assert (tmp_path / "plots" / "val_loss.csv").read_text() == "step,loss\n"
