"""pytest hooks. Thin on purpose: options live in settings.py, the session's items and results
in session.py, measuring in audit/ and axes/, llama.cpp in engines/, numbers in scoring/, the
report in report/.

Without --refract-model nothing here does any work, and llama_cpp is never imported.
"""

from __future__ import annotations

import pytest

from . import settings as settings_mod
from .errors import UsageProblem
from .session import RefractSession, get_session, install


def pytest_addoption(parser):
    settings_mod.register(parser)


def pytest_addhooks(pluginmanager):
    from . import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    from .axes import resolve

    try:
        if not settings_mod.wants_audit(config):
            return
        axes = resolve(axis for added in config.hook.pytest_refract_axes(config=config) for axis in added or ())
        s = settings_mod.read_settings(config, axes)
        from .audit.guard import check_run_files
        from .audit.runner import Runner

        # Any file this pytest run reads or writes, for any plugin, is never a report path.
        check_run_files({"--refract-json": s.json_path, "--refract-html": s.html_path}, config)

        runner = Runner(s, axes, is_worker=hasattr(config, "workerinput"))
        session = RefractSession(config, runner)
    except UsageProblem as exc:
        raise pytest.UsageError(str(exc)) from None
    install(config, session)


@pytest.fixture
def refract(request):
    """Measure your own prompts, corpus or needle under the candidate cache against the
    reference (see pytest_refract.fixtures.RefractFixture)."""
    rs = get_session(request.config)
    if rs is None:
        pytest.skip("the refract fixture needs --refract-model and --refract-candidate")
    from .fixtures import RefractFixture

    # In a candidate matrix the test is parametrized over candidates (pytest_generate_tests).
    return RefractFixture(rs.runner, request.node, getattr(request, "param", "cand0"))


