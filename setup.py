from setuptools import setup

setup(
    name="resticd",
    version="0.1.0",
    description="A restic REST backend server built on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=["resticd", "twisted.plugins"],
    package_data={"twisted.plugins": ["resticd_plugin.py"], "resticd": ["py.typed"]},
    install_requires=[
        # The upload path subclasses twisted.web's Request (gotLength,
        # handleContentChunk); keep to the range it was tested with.
        "twisted[tls,http2]>=26.10,<27",
        "pyopenssl>=26.4,<27",
        # resticd/h2.py's send loop keeps h2's flow-control windows itself.
        "h2>=4.4,<5",
        "service-identity>=26.1,<27",
        "cryptography>=50,<51",
        "prometheus-client>=0.26,<0.27",
        "libpass>=1.9.4,<2",
        "bcrypt>=5.0,<6",
    ],
    entry_points={"console_scripts": ["resticd-users = resticd.users:main"]},
    extras_require={
        "test": [
            "pytest>=9,<10",
            "pytest-twisted>=1.14,<2",
            "hypothesis>=6.170,<7",
            "treq>=26.7,<27",
            "mypy>=2.4,<3",
            "mypy-zope>=1.0.17,<2",
            "ruff>=0.17,<0.18",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Archiving :: Backup",
    ],
)
