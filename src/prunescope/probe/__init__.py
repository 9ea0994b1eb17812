"""Generation-bias probe: exact distributions of the values a model writes into "random" tables."""

from prunescope.probe.exact import ValueDistribution, value_distribution
from prunescope.probe.run import FieldDistribution, ProbeConfig, ProbeResult, TextField, run_probe, run_probe_on
from prunescope.probe.template import Column, Template, load_template, parse_template

__all__ = [
    "Column", "FieldDistribution", "ProbeConfig", "ProbeResult", "Template", "TextField",
    "ValueDistribution", "load_template", "parse_template", "run_probe", "run_probe_on", "value_distribution",
]
