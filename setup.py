"""The package list, which pyproject.toml cannot express: every package under packages/ plus the
shipped configs (packages/configs, the official layout) installed as `ernievil2/configs`, and
the search page's files.
Everything else is in pyproject.toml."""
from setuptools import find_packages, setup

setup(
    packages=find_packages("packages", include=["ernievil2", "ernievil2.*"]) + ["ernievil2.configs"],
    package_dir={"": "packages", "ernievil2.configs": "packages/configs"},
    package_data={"ernievil2.configs": ["*.yaml", "text/*.json"],
                  "ernievil2.serve": ["static/*", "classes/*.tsv"]},  # the page and its class lists
)
