"""Stage `encoder_mlm`: a new encoder pretrained from scratch by masked language modelling on the corpus
shards (BERT's 15 % / 80-10-10 recipe), with the corpus tokenizer plus a mask token of its own.

Outs: <paths.encoder_mlm>/ (encoder.pt, tokenizer.json), <paths.metrics>/encoder_mlm.json (test masked-LM loss
and masked-token accuracy), <paths.plots>/encoder_mlm/{train,val}_loss.csv; checkpoints in
<paths.checkpoints>/encoder_mlm/.
"""

from pathlib import Path

from lmpipe import atomic, tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "optimizer", "trainer", "perf", "logger", "mlm")


def main(cfg):
    from lmpipe.encoder.mlm import pretrain_encoder
    from lmpipe.encoder.outputs import write_encoder_dir
    from lmpipe.training.outputs import write_curves

    with tracking.stage_run("encoder_mlm", cfg, SECTIONS) as run:
        result = pretrain_encoder(cfg, run)
        if result is None:  # a DDP worker process
            return
        extra = {"stage": "encoder_mlm", "metrics": result.metrics}
        model_dir = write_encoder_dir(Path(cfg.paths.encoder_mlm), result.encoder, result.tokenizer, extra)
        write_curves(Path(cfg.paths.plots) / "encoder_mlm", result.curves)
        atomic.write_json(Path(cfg.paths.metrics) / "encoder_mlm.json", result.metrics)
        tracking.log_metrics(result.metrics, prefix="final")
        test = result.metrics["test"]
        print(
            f"encoder_mlm: {result.metrics['steps']} steps -> {model_dir}: test masked-LM loss "
            f"{test['mlm_loss']:.3f}, masked-token accuracy {test['masked_accuracy']:.3f}"
        )


if __name__ == "__main__":
    raise SystemExit(run_stage("encoder_mlm", SECTIONS, main))
