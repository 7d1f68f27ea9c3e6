"""Reports: plots written into a run's workdir."""
from jaxcompress.report.plots import plot_layer_bars

__all__ = ["plot_layer_bars"]
