"""Stage `register`: each ONNX variant as a new version of the registered MLflow model, then the gate.

Each directory of `register.variants` under `paths.onnx` becomes a version (a pyfunc that
`mlflow models serve` runs), tagged with its evaluate.json metrics and described by a model card. The new
version of `register.candidate` gets alias `candidate`, and takes alias `champion` only if it beats the
current champion on `register.metric` by more than `register.min_improvement`. The card describes the corpus
from the `data` section the pipeline prepared it with. The encoder classifier (`register.classifier`, by
default the int8 one) becomes a new version of its own registered model, `register.classifier_model_name`,
with alias `champion`.

Outs: <paths.metrics>/register.json (versions, aliases, the gate's decision; the classifier's version).
"""

import json
from pathlib import Path

from lmpipe import atomic, config, tracking
from lmpipe.errors import LmpipeError, require_file
from lmpipe.stage import run_stage

SECTIONS = ("paths", "data", "register", "logger")


def main(cfg):
    import mlflow

    from lmpipe import registry
    from lmpipe.encoder.serving import read_classifier_config
    from lmpipe.inference.onnx_dir import read_onnx_config
    from lmpipe.model_card import model_card

    rcfg = config.build(cfg.register)
    metrics_dir, onnx = Path(cfg.paths.metrics), Path(cfg.paths.onnx)
    source = require_file(metrics_dir / "evaluate.json", produced_by="evaluate")
    try:
        evaluation = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LmpipeError(f"{source} is not valid JSON: {exc}") from exc
    # Check every input before registering anything, so a bad one leaves the registry as it was.
    model_dirs = {v: onnx / v for v in rcfg.variants}
    for model_dir in model_dirs.values():
        read_onnx_config(model_dir)
    if rcfg.classifier:
        read_classifier_config(rcfg.classifier)
    value = registry.lookup_metric(evaluation, rcfg.candidate, rcfg.metric, source=str(source))

    commit, dirty = tracking.git_commit()
    provenance = {
        "git commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "pipeline": tracking.pipeline_id(),
    }
    with tracking.stage_run("register", cfg, SECTIONS):
        versions = {}
        for variant, model_dir in model_dirs.items():
            metrics = registry.variant_metrics(evaluation, variant)
            card = model_card(model_dir, metrics, provenance, config.to_container(cfg.data))
            versions[variant] = str(registry.log_model(model_dir, rcfg, metrics, card).version)
        client = mlflow.MlflowClient()
        decision = registry.promote(client, rcfg, versions[rcfg.candidate], value)
        aliases = {
            alias: str(version)
            for alias, version in client.get_registered_model(rcfg.model_name).aliases.items()
        }
        result = {
            "model_name": rcfg.model_name,
            "versions": versions,
            "aliases": aliases,
            "decision": decision,
        }
        if rcfg.classifier:
            result["classifier"] = registry.log_classifier(rcfg.classifier, rcfg, provenance)
        atomic.write_json(metrics_dir / "register.json", result)
    print(
        f"register: {rcfg.model_name} v{versions[rcfg.candidate]} ({rcfg.candidate}) "
        f"{'promoted to champion' if decision['promoted'] else 'not promoted'}: {decision['reason']}"
    )
    if rcfg.classifier:
        print(f"register: {rcfg.classifier_model_name} v{result['classifier']['version']} is the champion")


if __name__ == "__main__":
    raise SystemExit(run_stage("register", SECTIONS, main))
