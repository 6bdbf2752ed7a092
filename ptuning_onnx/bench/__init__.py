"""``ptuning-bench``: our runtime against the other ways to run the same model, in one run, as ratios.

Modules, in the order a run uses them:
- ``workloads.py``: what is measured (model shapes, token counts, batches) and the base models and PEFT adapters
  it is measured on, built from configs with fixed seeds;
- ``artifacts.py``: each contender's files (our exports, optimum's and onnxruntime-genai's exports of the base),
  built once into the ``--work`` folder and reused;
- ``contenders.py``: how each contender loads and runs, inside its own worker process;
- ``worker.py``: the worker processes and the round-robin schedule that times them;
- ``report.py``: medians, ratios, the issue's goals, the Markdown table, JSON and the PNG chart;
- ``cli.py``: the command.

Installed by the ``bench`` extra: ``pip install -c constraints.txt -e ".[bench]"``.
"""
