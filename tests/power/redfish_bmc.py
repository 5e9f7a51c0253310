"""A Redfish BMC for the tests: sushy-tools' emulator with its fake systems driver, as its
own process on loopback, with HTTP basic authentication.

    python -m tests.power.redfish_bmc PORT AUTH_FILE STATE_DIR [CERT KEY]

The fake driver applies a power change 1 to 11 s after it is asked (a random delay); here it
is 1 s, so a test sees the change pending, then done, within a short test.
"""

from __future__ import annotations

import sys


class _OneSecond:
    @staticmethod
    def randint(low: int, high: int) -> int:
        return 1


def main() -> None:
    from sushy_tools.emulator import main as emulator
    from sushy_tools.emulator.resources.systems import fakedriver

    fakedriver.random = _OneSecond
    port, auth_file, state_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    emulator.app.configure(extra_config={
        "SUSHY_EMULATOR_STATE_DIR": state_dir,  # its systems persist there: one per test
        "SUSHY_EMULATOR_FAKE_DRIVER": True, "SUSHY_EMULATOR_AUTH_FILE": auth_file,
        "SUSHY_EMULATOR_FAKE_SYSTEMS": [{
            "uuid": "27946b59-9e44-4fa7-8e91-f3527a1ef094", "name": "node1",
            "power_state": "Off", "external_notifier": False,
            "nics": [{"mac": "52:54:00:00:00:01", "ip": "10.0.0.1"}]}]})
    ssl_context = None
    if len(sys.argv) > 5:
        import ssl

        ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_context.load_cert_chain(sys.argv[4], sys.argv[5])
    emulator.app.run(host="127.0.0.1", port=port, ssl_context=ssl_context, threaded=True)


if __name__ == "__main__":
    main()
