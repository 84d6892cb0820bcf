"""The paper study, apart from the library (as open_clip keeps ``open_clip_train`` apart from ``open_clip``).

* :mod:`jfe_study.demo` — the main job: build MiniBEIR, train the four models of the comparison at equal towers
  (jfe-mini, two-tower, score fusion, feature fusion), evaluate them, write the report (`make demo`).
* :mod:`jfe_study.reproduce` — the comparison at convergence: learning curves to a plateau, several seeds at that
  budget, bootstrap intervals of the fusion margin (`make reproduce`).
* :mod:`jfe_study.curves`, :mod:`jfe_study.bootstrap`, :mod:`jfe_study.seeds` — plateaus, bootstrap intervals
  and the across-seeds report they use.

The library (``jfe``) never imports this package; its commands reach the ``jfe`` command through the
``jfe.commands`` entry point (:mod:`jfe_study.commands`).
"""
