"""Weight analyses: singular values, spectra and conditioning, KappaTune selection and export, batch runs, the forgetting experiment."""
