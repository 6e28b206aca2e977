# What CI installs (sourced by .ci/run and .ci/lock, so both resolve the same set).
# torch/torchvision: the CPU-usable builds that lie on the development machines' disk.
TORCH=(torch==2.14.1 torchvision==0.29.1)
# zsbir with every extra, and the plugin distributions of this repository.
PROJECT=(-e ".[dev,weights,serve,tensorboard,report,export,milvus,ray]"
         -e ./plugins/zsbir-example -e ./plugins/zsbir-rpkd -e ./plugins/zsbir-clip
         -e ./plugins/zsbir-peft -e ./plugins/zsbir-zse)
