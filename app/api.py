"""Python API for notebooks: open sources and the store, run analyses through the cache.

    >>> from app import api
    >>> spectra = api.analyze("minilm")            # computed once, then served from the store
    >>> api.conditioning("minilm").head()          # one row per matrix, lowest kappa first

Every function takes ``store=`` (a ``Store``, a directory, or None for the default store).
"""

from __future__ import annotations

from analysis.run import open_store, register_source as register  # noqa: F401 (old public names, kept)
from analysis.sources import Source, open_source  # noqa: F401
from analysis.store import Store, default_store_root as default_store_dir  # noqa: F401

# -- weight spectra, KappaTune selection and export, the forgetting experiment: analysis/weights/pipeline.py --
from analysis.weights.pipeline import (SPECTRA_NAME as SPECTRA, analyze, conditioning,  # noqa: F401
                                       experiment_kappatune, export, export_text,
                                       find_spectra, has_spectra, kappatune_experiment, list_spectra,
                                       load_experiment, load_spectra, select, select_from_spectra, spectra_params,
                                       stored_experiments, stored_kappatune_experiments, stored_spectra)


# -- bilinear MLPs (issue 4): implemented in analysis/bilinear/pipeline.py ------------------------
from analysis.bilinear.pipeline import (BILINEAR, BILINEAR_TRAIN_KINDS, bilinear_decompose,  # noqa: E402,F401
                                        bilinear_explain, bilinear_params, bilinear_top, bilinear_train,
                                        find_bilinear, load_bilinear, stored_bilinear)


# -- MMoE probes, expert specialisation, routed MoEs (issue 5): analysis/experts/pipeline.py -------
from analysis.experts.pipeline import (BiasDemo, DataSpec, ExpertReport, MMoECurve,  # noqa: E402,F401
                                       experts_routing, load_expert_report, load_experts_routing,
                                       load_mmoe_bias, load_mmoe_curve, mmoe_analyze, mmoe_bias, mmoe_curves,
                                       mmoe_features, mmoe_probe, mmoe_train, stored_bias_demos,
                                       stored_expert_reports, stored_experts_routing, stored_mmoe_bias,
                                       stored_mmoe_curves, stored_routing)

# -- steering vectors (issue 6): analysis/steering/pipeline.py (stored) and pipeline_vectors.py ------------
from analysis.steering.pipeline import (find_dose_response, find_layer_sweep, load_dose_response,  # noqa: E402,F401
                                        load_extraction, load_layer_sweep, steer_dose, steer_dose_response,
                                        steer_extract, steer_generate, steer_layers, steer_sweep,
                                        stored_dose_response, stored_dose_responses, stored_extractions,
                                        stored_layer_sweep, stored_layer_sweeps)
from analysis.steering.pipeline_vectors import (contrast_sets, export_steering_gguf,  # noqa: E402,F401
                                                load_steering_vector, save_steering_vector, steer_apply,
                                                steer_orthogonalize, steer_vector)

# -- batch runs over many sources, local processes or Ray (issue 7): analysis/weights/batch_pipeline.py --
from analysis.weights.batch_pipeline import BatchItem, analyze_many  # noqa: E402,F401

# -- attention-output SAEs (issue 3): implemented in app/api_sae.py --------------------------------
from app.api_sae import (SAEEvaluation, TrainedSAE, evaluate_sae, find_sae, has_sae_eval,  # noqa: E402,F401
                         has_sae_features, list_saes, load_sae, sae_features, sae_polysemantic, sae_prompt,
                         stored_sae_eval, stored_sae_features, train_sae)
from app.api_sae_saelens import export_saelens, import_saelens  # noqa: E402,F401
from analysis.circuits.pipeline import circuits, find_circuits, load_circuits, stored_circuits  # noqa: E402,F401
