"""The pytest glue: options, markers, fixtures, report sections."""
