"""The alert rules (charts/kubeseg/files/prometheus-rules.yaml) under `promtool test rules`."""
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed")
def test_alert_rules_pass_promtool_unit_tests():
    rules = HERE.parents[1] / "charts" / "kubeseg" / "files" / "prometheus-rules.yaml"
    check = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert check.returncode == 0, check.stdout + check.stderr
    result = subprocess.run(["promtool", "test", "rules", "alert_rules_test.yaml"], cwd=HERE,
                            capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
