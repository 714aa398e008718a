"""The test session's lorakit cache is its own folder (tests/conftest.py), never the user's."""

import os
import tempfile
from pathlib import Path


def test_the_session_uses_its_own_lorakit_cache():
    import platformdirs

    from lorakit.models.cache import cache_root

    root = cache_root().resolve()
    assert root != Path(platformdirs.user_cache_dir("lorakit")).resolve()
    if not os.environ.get("LORAKIT_TEST_CACHE_DIR"):
        assert root.parent == Path(tempfile.gettempdir()).resolve()
        assert root.name.startswith("lorakit-test-cache-")
