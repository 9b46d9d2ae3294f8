"""Packaging for the Distributed Service Proxy (DSP) and its DVK boundary."""

import re

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"',
                    open("dsp_proxy/__init__.py", encoding="utf-8").read()).group(1)

setup(
    name="dsp-proxy",
    version=VERSION,
    description="Distributed Service Proxy for DVS clusters, with a user-space DVK emulator",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dsp_proxy", "dsp_proxy.*", "dvk_cffi", "dvk_cffi.*",
                                    "dvs_apps", "dvs_apps.*"]),
    # the compiled relay's source (its build and the check that a module matches it), and
    # the module when it was built in the tree before installing
    package_data={"dsp_proxy": ["fastrelay.c", "_fastrelay.*.so"]},
    install_requires=[
        "cffi>=1.16,<3",
        "psutil>=5.9,<8",
        "lz4>=4.3,<5",
        "paramiko>=3.4,<5",  # vm_start/vm_stop/vm_status on the hypervisor host over ssh
    ],
    extras_require={
        "test": ["pytest>=7.4,<10", "pytest-timeout>=2.2,<3", "ruff>=0.4,<1",
                 "prometheus_client>=0.17,<1",  # the /metrics test parses with its parser
                 "wheel>=0.41,<1"],  # the install test builds the package without a download
    },
    entry_points={
        "console_scripts": [
            "dsp_proxy=dsp_proxy.main:main",
            "dvsctl=dvs_apps.dvsctl:main",
            "latency_server=dvs_apps.latency:server_main",
            "latency_client=dvs_apps.latency:client_main",
            "m3ftpd=dvs_apps.m3ftp:server_main",
            "m3ftp=dvs_apps.m3ftp:client_main",
        ],
    },
)
