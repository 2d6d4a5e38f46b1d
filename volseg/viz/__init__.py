"""Pictures of scans, label maps and runs: static matplotlib figures (:mod:`.figures`) and an
interactive NiiVue viewer for pages (:mod:`.page`, :func:`write_viewer`) and notebooks
(:func:`view`). Heavy libraries load on first use."""

from .figures import VIEWS, browse, error_map, montage, overlay, plot_training_curves, save_figure
from .niivue import NIIVUE_VERSION, ViewerError, niivue_script
from .notebook import view
from .page import MAX_PAGE_BYTES, VIEWER_CSS, viewer_section, write_viewer
from .plots import plot_metric_per_class
from .volumes import ViewerCase, pack_case

__all__ = ["overlay", "montage", "error_map", "browse", "plot_training_curves", "save_figure", "VIEWS",
           "view", "write_viewer", "viewer_section", "pack_case", "ViewerCase", "ViewerError", "niivue_script",
           "NIIVUE_VERSION", "MAX_PAGE_BYTES", "VIEWER_CSS", "plot_metric_per_class"]  # fmt: skip
