"""Shared fixtures. Each area keeps its fixtures in tests/support/fx_<area>.py;
they are loaded here as pytest plugins so any test module can use them."""
import pathlib

pytest_plugins = sorted(
    f"tests.support.{p.stem}"
    for p in (pathlib.Path(__file__).parent / "support").glob("fx_*.py")
)
