"""LensLab dashboard: ``lenslab dashboard`` (or ``streamlit run app/dashboard.py``).

Pages read the results store (``$LENSLAB_STORE``) and launch analyses with a progress bar;
they never compute metrics themselves. To add a page, create ``app/pages/<name>.py`` and
append one ``st.Page`` line to ``PAGES`` below. A page's first statement should be
``store = app.state.get_store()``: it also reroutes a page Streamlit ran without this script
(its legacy mode for a ``pages/`` folder, see ``app/state.py``). Pages run under
``app.page_errors.run_page``: an error a page does not catch is one short line in the browser and
a traceback in the server log. A value a page hands to ``app.api`` as a file goes through
``app.allowed_paths`` (``tests/test_dashboard_paths.py`` checks every page for it).
"""

from __future__ import annotations

import streamlit as st

from app.page_errors import run_page
from app.state import store_root

st.set_page_config(page_title="LensLab", page_icon=":material/biotech:", layout="wide")

# The page list (paths relative to this file). Append new pages here.
PAGES = [
    st.Page("pages/home.py", title="Models", icon=":material/home:", default=True),
    st.Page("pages/spectra.py", title="Conditioning & spectra", icon=":material/show_chart:"),
    st.Page("pages/selection.py", title="KappaTune selection", icon=":material/checklist:"),
    st.Page("pages/experiments.py", title="Experiments", icon=":material/science:"),
    st.Page("pages/bilinear.py", title="Bilinear MLPs", icon=":material/grid_on:"),
    st.Page("pages/experts.py", title="Experts", icon=":material/hub:"),
    st.Page("pages/steering.py", title="Steering", icon=":material/tune:"),
    st.Page("pages/sae.py", title="Attention SAEs", icon=":material/blur_on:"),
    st.Page("pages/sae_features.py", title="SAE features", icon=":material/manage_search:"),
    st.Page("pages/sae_prompt.py", title="SAE prompt", icon=":material/edit_note:"),
]

page = st.navigation(PAGES)
st.sidebar.caption(f"Store: `{store_root()}`")
run_page(page)  # a failure is one short line in the browser; its traceback goes to the server log
