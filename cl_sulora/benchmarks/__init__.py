"""Continual-learning benchmark builders (Avalanche scenarios) and their registry."""

from .bbc_news import build_bbc_news
from .cifar100 import build_split_cifar100
from .common import BenchmarkSpec, resolve_data_root
from .domainnet import build_domainnet_dil
from .glue import build_long_text, build_split_glue
from .image_folders import build_image_folders
from .pacs import build_pacs_dil
from .registry import (
    BENCHMARKS,
    benchmark_options,
    build_benchmark,
    option_type_errors,
    register_benchmark,
)
from .sentiment import build_sentiment_dil

__all__ = [
    "BENCHMARKS",
    "BenchmarkSpec",
    "benchmark_options",
    "build_bbc_news",
    "build_benchmark",
    "build_domainnet_dil",
    "build_image_folders",
    "build_long_text",
    "build_pacs_dil",
    "build_sentiment_dil",
    "build_split_cifar100",
    "build_split_glue",
    "option_type_errors",
    "register_benchmark",
    "resolve_data_root",
]
