"""mirrord: keeps fragment-screening data moving between Fragalysis, ISPyB, PDIS and Design Hub."""


def __getattr__(name: str) -> str:
    # Looked up on first use: importlib.metadata costs a noticeable part of a quick command's start.
    if name != "__version__":
        raise AttributeError(f"module 'mirrord' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("mirrord")
    except PackageNotFoundError:  # running from a source tree that was never installed
        found = "0.0.0+source"
    globals()["__version__"] = found
    return found
