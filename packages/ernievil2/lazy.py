"""Names of a package imported on first use (PEP 562), so importing the package stays cheap."""
import importlib


def lazy_exports(package, exports, namespace):
    """(__getattr__, __dir__) for a package whose `exports` maps a name to the submodule (relative
    to `package`) that defines it; a loaded name is cached in the package's `namespace`."""
    def __getattr__(name):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
