"""Host-side toolchain: DarkNet19 training, int8 conversion, mRMR + SVM head, bundle."""
