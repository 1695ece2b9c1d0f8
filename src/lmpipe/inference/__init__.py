"""Running an exported model without torch: the ONNX Runtime engine (`engine`), next-token sampling and its
defaults (`sampling`), the export directory's config (`onnx_dir`), the one model resolver for a directory or a
`models:/` URI (`resolver`), the MLflow pyfunc (`pyfunc`) and the `infer` stage's batch job (`batch`).

Nothing on the serving path imports torch, so a server needs only onnxruntime, numpy, tokenizers and jinja2.
"""
