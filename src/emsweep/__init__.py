"""emsweep: emergent-misalignment experiments at sweep scale (see README.md and docs/).

Stages, one module each: data, finetune, sample, judge, analyze; the DAG (dag.py), the store
(store.py) and the sweep spec (spec.py) are separate small modules.
"""

__version__ = "0.1.0"
