"""QR-Adaptor workbook: per-block bit-width and LoRA-rank allocation for quantized fine-tuning.

The stages, in the order the notebooks run them: data and models (data.py, models.py), quantization
(quant/, build.py, memory.py), Phase I (sensitivity.py), the proxy (fitness.py), Phases II-III
(search/), the final fine-tune and its comparison (finetune.py, evaluate.py, comparison.py, stats.py,
calibration.py), and what reads artifacts only (report.py, plots.py, explorer.py).
"""
