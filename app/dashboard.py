"""LensLab dashboard: ``lenslab dashboard`` (or ``streamlit run app/dashboard.py``).

Pages read the results store (``$LENSLAB_STORE``) and launch analyses with a progress bar;
they never compute metrics themselves. To add a page, create ``app/views/<name>.py`` and
append one ``st.Page`` line to ``PAGES`` below. The folder is not named ``pages/``, so Streamlit
never runs a page on its own (its legacy multipage mode): every request goes through this
script's ``st.navigation``. A page's first statement is ``store = app.state.get_store()``. Pages run under
``app.page_errors.run_page``: an error a page does not catch is one short line in the browser and
a traceback in the server log. A value a page hands to ``app.api`` as a file goes through
``app.allowed_paths`` (``tests/app/test_dashboard_paths.py`` checks every page for it).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app.page_errors import run_page
from app.state import store_root

# The favicon is a local SVG (sent inline as a data: URL): a ":material/...:" page icon makes the browser fetch
# it from a font CDN, which fails offline. The sidebar's material icons come from Streamlit's bundled font.
FAVICON = Path(__file__).resolve().parent / "static" / "favicon.svg"
st.set_page_config(page_title="LensLab", page_icon=str(FAVICON), layout="wide")

# The page list (paths relative to this file). Append new pages here.
PAGES = [
    st.Page("views/home.py", title="Models", icon=":material/home:", default=True),
    st.Page("views/spectra.py", title="Conditioning & spectra", icon=":material/show_chart:"),
    st.Page("views/selection.py", title="KappaTune selection", icon=":material/checklist:"),
    st.Page("views/experiments.py", title="Experiments", icon=":material/science:"),
    st.Page("views/bilinear.py", title="Bilinear MLPs", icon=":material/grid_on:"),
    st.Page("views/experts.py", title="Experts", icon=":material/hub:"),
    st.Page("views/steering.py", title="Steering", icon=":material/tune:"),
    st.Page("views/steering_search.py", title="Steering search", icon=":material/query_stats:"),
    st.Page("views/sae.py", title="Attention SAEs", icon=":material/blur_on:"),
    st.Page("views/sae_features.py", title="SAE features", icon=":material/manage_search:"),
    st.Page("views/sae_prompt.py", title="SAE prompt", icon=":material/edit_note:"),
    st.Page("views/sae_compare.py", title="Compare SAEs", icon=":material/scatter_plot:"),
    st.Page("views/circuits.py", title="Attention circuits", icon=":material/account_tree:"),
]

# expanded: every page listed (Streamlit folds more than 10 behind "View more")
page = st.navigation(PAGES, expanded=True)
st.sidebar.caption(f"Store: `{store_root()}`")
run_page(page)  # a failure is one short line in the browser; its traceback goes to the server log
