"""``make bench``: the appliance's speed, memory and start-up, measured as ratios in one run.

Absolute times on shared machines drift, so every figure is either a ratio of
two things measured in the same run (loop / bare invoke, loaded / idle) or an
absolute figure measured here and reported with the machine it came from.
Sections:

- ``bench.peers``: the shipped int8 TFLite beside a float32 TFLite and
  onnxruntime float32 of the same weights (built once, cached by sha256).
- ``bench.loop``: the real :class:`device.service.Service` (replay source,
  gpiozero MockFactory, temporary state dir) timed per field and per stage,
  idle and under loopback page load; preprocessing and head micro-timings.
- ``bench.proc``: ``python -m device run`` as a subprocess: first result
  after start, peak RSS and growth over 1,000 fields.
- ``bench.macs``: multiply-accumulates walked from the TFLite graph, and the
  clearly labelled Pi 4 / Pi 5 / Coral estimates from public figures.
- ``bench.report``: targets, ``results.json`` and the Markdown table.

Not part of ``device/`` (it imports torch-free device code only, and runs the
host toolchain in subprocesses when it builds the peer models).
"""
