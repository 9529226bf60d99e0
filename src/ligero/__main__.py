from ligero.cli import main
import sys
sys.exit(main())
