"""Python API for notebooks: every analysis's functions, re-exported from its folder's ``pipeline.py``.

    >>> from app import api
    >>> spectra = api.analyze("minilm")            # computed once, then served from the store
    >>> api.conditioning("minilm").head()          # one row per matrix, lowest kappa first
    >>> api.circuits("minilm").grid("kappa", "QK") # per-head QK circuit kappa, layers x heads

Conventions, the same for every analysis:
- a function named for its CLI command (``lenslab steer dose`` is ``api.steer_dose``) computes once and
  stores; it takes ``store=`` (a ``Store``, a directory, or None for the default store), ``refresh=``,
  ``progress=`` (``(done, total, label)``) and, where torch runs, ``device="auto" | "cpu" | "cuda" | "mps"``;
- ``stored_<thing>(fingerprint=None, store=None)`` lists index rows (``EntryInfo``), newest first, never
  computing; ``load_<thing>(key)`` returns the result or raises ``NotStoredError``; ``find_<thing>(fingerprint,
  <settings>)`` returns the result stored for exactly those settings, or None;
- ``stored(analysis)``, ``load(key)`` and ``find(...)`` below do the same for any registered analysis
  (``ANALYSES`` lists them); ``DEPRECATED`` maps old names, which still work and warn, to the new ones.

This module defines nothing itself: a new analysis adds one import line here.
"""

from __future__ import annotations

from analysis.run import REGISTRY as ANALYSES  # noqa: F401  (name -> Analysis, filled by the imports below)
from analysis.run import NotStoredError, RunCancelled, find, load, open_store, stored  # noqa: F401
from analysis.run import register_source as register  # noqa: F401  (old public name, kept)
from analysis.sources import Source, open_source  # noqa: F401
from analysis.store import EntryInfo, Store, default_store_root as default_store_dir  # noqa: F401

# -- weight spectra, KappaTune selection and export, the forgetting experiment: analysis/weights/ ---------
from analysis.weights.pipeline import (SPECTRA_NAME as SPECTRA, analyze, conditioning,  # noqa: F401
                                       experiment_forgetting, experiment_kappatune, export, export_text,
                                       find_spectra, has_spectra, kappatune_experiment, list_spectra,
                                       load_experiment, load_spectra, select, select_from_spectra, spectra_params,
                                       stored_experiments, stored_kappatune_experiments, stored_spectra)
from analysis.weights.batch_pipeline import BatchItem, analyze_many  # noqa: F401

# -- bilinear MLPs: analysis/bilinear/ --------------------------------------------------------------------
from analysis.bilinear.pipeline import (BILINEAR, BILINEAR_TRAIN_KINDS, bilinear_decompose,  # noqa: F401
                                        bilinear_explain, bilinear_params, bilinear_top, bilinear_train,
                                        find_bilinear, load_bilinear, stored_bilinear)

# -- MMoE probes, expert specialisation, routed MoEs: analysis/experts/ -----------------------------------
from analysis.experts.pipeline import (BiasDemo, DataSpec, ExpertReport, MMoECurve,  # noqa: F401
                                       experts_routing, load_expert_report, load_experts_routing,
                                       load_mmoe_bias, load_mmoe_curve, mmoe_analyze, mmoe_bias, mmoe_curves,
                                       mmoe_features, mmoe_probe, mmoe_train, stored_bias_demos,
                                       stored_expert_reports, stored_experts_routing, stored_mmoe_bias,
                                       stored_mmoe_curves, stored_routing)

# -- steering vectors: analysis/steering/ (pipeline.py stores, pipeline_vectors.py does not) --------------
from analysis.steering.pipeline import (find_dose_response, find_layer_sweep, load_dose_response,  # noqa: F401
                                        load_extraction, load_layer_sweep, steer_dose, steer_dose_response,
                                        steer_extract, steer_generate, steer_layers, steer_sweep,
                                        stored_dose_response, stored_dose_responses, stored_extractions,
                                        stored_layer_sweep, stored_layer_sweeps)
from analysis.steering.pipeline_audit import (AuditResult, load_audit, steer_audit, steer_edit,  # noqa: F401
                                              steer_lora, stored_audits)
from analysis.steering.pipeline_search import (SearchResult, load_search, steer_search,  # noqa: F401
                                               steer_search_export, stored_searches)
from analysis.steering.pipeline_vectors import (contrast_sets, export_steering_gguf,  # noqa: F401
                                                load_steering_vector, save_steering_vector, steer_apply,
                                                steer_orthogonalize, steer_vector)

# -- attention-output SAEs: sae/ ---------------------------------------------------------------------------
from sae.pipeline import (SAEEvaluation, TrainedSAE, evaluate_sae, find_sae, find_sae_eval,  # noqa: F401
                          find_sae_features, has_sae_eval, has_sae_features, list_saes, load_sae, sae_eval,
                          sae_features, sae_list, sae_polysemantic, sae_prompt, sae_train, stored_sae_eval,
                          stored_sae_features, train_sae)
from sae.saelens_io import export_saelens, import_saelens, sae_export, sae_import  # noqa: F401
from sae.eval_pipeline import (GroundTruthResult, ProbeResult, find_sae_groundtruth, find_sae_probe,  # noqa: F401
                               groundtruth_rows, load_sae_groundtruth, load_sae_probe, probe_rows, sae_groundtruth,
                               sae_groundtruth_table, sae_probe, stored_sae_groundtruth, stored_sae_probe)
from sae.transcoder_pipeline import (TranscoderRun, find_sae_transcoder, load_sae_transcoder,  # noqa: F401
                                     sae_transcoder, sae_transcoders, stored_sae_transcoders)

# -- per-head attention circuit spectra: analysis/circuits/ -----------------------------------------------
from analysis.circuits.pipeline import circuits, find_circuits, load_circuits, stored_circuits  # noqa: F401

# -- the first-run job: one small result per analysis (lenslab quickstart, make run): app/first_run.py ---------
from app.first_run import STEPS as QUICKSTART_STEPS, quickstart  # noqa: F401

# -- old names (each still works as before and warns) -> new names -----------------------------------------
from analysis.bilinear.pipeline import DEPRECATED as _bilinear_old
from analysis.circuits.pipeline import DEPRECATED as _circuits_old
from analysis.experts.pipeline import DEPRECATED as _experts_old
from analysis.steering.pipeline import DEPRECATED as _steering_old
from analysis.weights.pipeline import DEPRECATED as _weights_old
from sae.pipeline import DEPRECATED as _sae_old

DEPRECATED: dict[str, str] = {**_weights_old, **_bilinear_old, **_experts_old, **_steering_old, **_sae_old,
                              **_circuits_old}
